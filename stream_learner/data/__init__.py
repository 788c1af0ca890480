"""Data for evaluation and tests: the download cache, the users' file readers, the dataset
builders and the adversarial text corpus.
"""
