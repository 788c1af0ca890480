"""State that outlives a process: checkpoints, their keys, the restricted unpickler that
reads them back, and the atomic file writes under them.
"""
