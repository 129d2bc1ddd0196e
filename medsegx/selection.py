"""The names of the output-selection rules (``--select``): a leaf of the package, no numpy or torch, so
that the command-line parsers, the model config (the per-backbone defaults) and the metrics (the rules
themselves, :mod:`medsegx.metrics.select`) all read one list. "oracle" looks at the label (the paper's
evaluation protocol); the others never do.
"""
LABEL_FREE_MODES = ("iou", "first", "stability", "agreement", "iou_stable", "first_stable", "first_confident",
                    "first_consensus")
SELECTION_MODES = ("oracle", *LABEL_FREE_MODES)
