"""The learners: the registry that builds every learner by name, our naive Bayes, the numpy
neural learner (neural/) and the pretrained sentence encoder.
"""
