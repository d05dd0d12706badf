"""The pure core shared by every front end and the trainer (being gathered here; see docs/architecture.md)."""
