"""Model fusion between workers: signed snapshots on a models topic, folded into each
worker's own learners by a rule per learner kind.
"""
