"""The pure core shared by every front end and the trainer: paths, the prediction registry, coefficient tables,
the step (sampling and training forms, and the fused path), schedules, argument checks. No state; see
docs/architecture.md."""
