"""The example trainer: SigLIP two towers, CLIP-style or LiT, with ``siglip_fast.sigmoid_loss``.

Needs the ``train`` extra (``pip install "siglip-fast[train]"``). Run it with
``python -m siglip_fast.train``; see ``siglip_fast.train.trainer`` and docs/TRAINING.md.

Modules: ``trainer`` (the run), ``models`` (the towers), ``data`` (the embedded shapes data and
CSV/TSV manifests), ``tokenizer``, ``evaluate``, ``checkpoint`` (orbax), ``plots``, and
``configs/`` (configs as code).
"""
