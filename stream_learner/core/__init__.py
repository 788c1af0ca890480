"""The data flow of one record: decode it (records), turn its text into features (features),
predict, score and learn (processor, evaluation), watch the error stream (drift), and
hold records until their labels come (labels).
"""
