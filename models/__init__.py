"""Networks: student backbones, the prediction head, the loss, teachers and checkpoint formats.

Ground floor: nothing here imports from ``tools/`` or the entry scripts.
"""
