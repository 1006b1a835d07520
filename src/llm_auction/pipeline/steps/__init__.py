"""The irpo-epoch steps: strings and paths in, a JSON-able summary out; each calls the library directly.

KFP components (`components/`) are thin wrappers over these, so the same code runs in a pod on the
cluster, in a `kfp.local` subprocess, and in a test: component -> step -> library, nothing between.
The settings travel between steps as the JSON that `common.resolve_settings` validated once at the start.

One module per step, and this package imports none of them: a step's process (a pod, a kfp.local
subprocess) imports only what its step needs, so the registry steps (configure, canary, admit,
deploy) start in a few seconds without torch, Feast or TRL (tests/test_architecture.py checks it).

Every step reads only the public side: the platform's exports (`Settings.public_dir`: catalog,
profiles, held-out and synthetic request files), the feedback store (request log, impressions,
clicks), the feature store and the registry. Nothing here imports the simulator.
"""
