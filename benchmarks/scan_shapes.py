"""The selective-scan shapes every scan benchmark times: MambaVision's stage-3/4 mixers at batch 128, d_state 8."""

SHAPES = {  # tag: (batch, length, dim)
    "T_stage3": (128, 196, 160),
    "T_stage4": (128, 49, 320),
    "B_stage3": (128, 196, 256),
    "B_stage4": (128, 49, 512),
    "L_stage3": (128, 196, 392),
    "L_stage4": (128, 49, 784),
}
N_STATE = 8
INNER_REPS = 8  # passes over the input sets per timed window
