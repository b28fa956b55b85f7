"""Helpers several methods share (no method of its own): this rank's reduced gradient and the
gradient of an extra batch under ZeRO (:mod:`.grads`)."""
