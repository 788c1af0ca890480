"""The numpy wide-and-deep incremental learner: the model, its file format and its
initialization from a pretrained encoder.
"""
