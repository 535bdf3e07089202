"""rqpipe's pipeline: the stages as Ray jobs over the machinery they share.

Layers, bottom to top (a module imports only from its own layer or those below it):
  model/            (outside pipeline/) the torch modules and their training steps
  pipeline/core/    storage, manifests, config loading, checkpoints, Ray plumbing
  pipeline/formats/ data at rest: code tables, shard tars, image bytes <-> pixels <-> grids
  pipeline/stages/  one module per stage: its config, its Ray plan, its worker code
  pipeline/tools/   what users run on a finished run: code stats, queries, decoding, converters
  pipeline/run.py   the stages in order (`rqpipe run`)
  pipeline/demo/    the bundled demo: data, run, check
  pipeline/cli.py   the `rqpipe` command
tests/test_layers.py checks it.
"""
