"""The names of the output-selection rules (``--select``): a leaf of the package, no numpy or torch, so
that the command-line parsers, the model config (the per-backbone defaults), the reports and the metrics
(the rules themselves, :mod:`medsegx.metrics.select`) all read one list. :data:`ORACLE` looks at the label
(the paper's evaluation protocol); the others never do.
"""
ORACLE = "oracle"
# The label-free rules, in their order everywhere (choices, reports), and what each reads: the IoU head,
# the logits (stability) or the masks (agreement).
MODE_NEEDS = {"iou": ("iou",), "first": (), "stability": ("stability",), "agreement": ("agreement",),
              "iou_stable": ("iou", "stability"), "first_stable": ("iou", "stability"),
              "first_confident": ("iou",), "first_consensus": ("iou", "agreement")}
LABEL_FREE_MODES = tuple(MODE_NEEDS)
SELECTION_MODES = (ORACLE, *LABEL_FREE_MODES)
