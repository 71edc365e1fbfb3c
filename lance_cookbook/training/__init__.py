"""The training script's machinery (``python -m lance_cookbook.train``).

Checkpoints and run state, distributed helpers, the learning-rate schedule, models and reports. Like
torchvision's ``references/classification/utils.py``: read ``train.py`` first.
"""
