"""trainsup supervisor: launches and watches `accelerate launch` children.

Nothing in this package imports torch or accelerate (docs/architecture.md, "Import rule"): `trainsup --help`
must start fast, and the supervisor must keep working when a rank's torch is broken.
"""

__version__ = "0.1.0"
