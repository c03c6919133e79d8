"""Not MotiF: the CPU demo (`python train.py --preset shapes`), on synthetic videos where only the text tells the motion.

    unet.py    what a 3 M-parameter U-Net adds to VideoCrafter2's to read its prompt at 32x32
    shapes.py  the shapes videos, their exact flow, the held-out first frames and their prompts
    bench.py   ShapesBench: does a checkpoint move the shape the prompt names, the way it says?
"""
