"""The ``stream-learner`` command line: one module per command that is only a command.
"""
