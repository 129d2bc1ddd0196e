"""The 256 grid: the side of every MedSegDB slice, which conversion writes, the dataset serves, the models
take as their input size and every box prompt lives on; and the paper's training box jitter on it.

No numpy: the model config and the command-line parsers read it.
"""
SLICE_SIZE = 256
# Training boxes grow by a random 0..N px per side: the paper's N (the dataset's default; the jitter of each
# backbone, ``--box_jitter`` when not given, is medsegx.model.config.default_box_jitter's).
PAPER_BOX_JITTER = 20
