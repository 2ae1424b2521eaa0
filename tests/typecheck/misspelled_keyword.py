"""A user's script with a misspelled keyword: the type checker must report it."""

import matterhorn_pytorch as mth

conv = mth.snn.Conv2d(2, 4, kernel_sise=3)
