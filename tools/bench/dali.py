"""NVIDIA DALI's own loader, a speed reference of the benchmark only (an optional dependency).

Training does not offer it: DALI's reader shards and shuffles the files itself and its decoder draws
its own RandomResizedCrop boxes, so a run would give up the per-sample (seed, epoch, index) crops and
order that make resuming exact and that every decoder here shares; feeding it our boxes
(``fn.external_source`` plus ROI decoding) would redo what ``--decode gpu`` (batched nvJPEG in
:mod:`data.device_decode`) already does, with a CUDA-only dependency no CPU test could cover.
"""

from __future__ import annotations

from collections.abc import Sequence


def dali_available() -> bool:
    """Whether NVIDIA DALI is importable."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_iterator(
    files: Sequence[str], batch_size: int, size: int, num_threads: int, device_id: int = 0, seed: int = 0
):
    """A DALI pipeline (GPU decoding with ROI crops) yielding uint8 (B, 3, S, S) CUDA batches.

    Its RandomResizedCrop boxes follow the same distribution (area 0.2-1, aspect 3/4-4/3), not our RNG.
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=list(files), random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed", output_type=types.RGB, random_area=[0.2, 1.0], random_aspect_ratio=[0.75, 4 / 3]
        )
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
        return fn.crop_mirror_normalize(
            images, dtype=types.UINT8, output_layout="CHW", mirror=fn.random.coin_flip(probability=0.5)
        )

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    p.build()
    return DALIGenericIterator(p, ["images"], reader_name="reader", auto_reset=True)
