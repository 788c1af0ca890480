"""A long-running worker: its configuration, the consume-process-produce loop, metrics and
health endpoints, and the supervisor of several worker processes.
"""
