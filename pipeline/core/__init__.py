"""The machinery under every stage: storage, manifests, config loading, checkpoints, progress
and the Ray / Ray Train plumbing. Never imports a stage."""
