"""Development code outside the shipped package: the demo model's training and evaluation data
(``demo_data``), the baseline saliency maps (``baselines``) and the whole-scan evaluation (``whole_scan``) that
tools/, benchmarks/ and Testing/ share.

Not in the wheel nor in the Slicer module. Importable from the repository root (``python -m tools.x``,
``python -m benchmarks.x``; pytest puts the root on its path).
"""
