"""The teacher feature cache, both sides of its file: ``builder.py`` writes it, ``reader.py`` reads it back.

``FILE.npy`` (one contiguous float16 array) and its manifest ``FILE.json``; ``python -m
tools.cache_teacher_features`` builds one, ``train_student.py --use_cache --teacher_feats FILE.npy`` trains
on it. The builder runs the teacher over the data on every rank of a torchrun job
(:mod:`tools.engine.distributed`), which is why the pair lives in ``tools/``: the ground floor
(``models/``, ``data/``) never imports it, and nothing there needs the cache.
"""
