"""The five stages, one module each (shard, train_vae, encode, train_ar, sample): its config
dataclass, its Ray plan (`run_*_stage`) and the code its workers run. Stages never import one
another; what two share lives in core/ or formats/."""
