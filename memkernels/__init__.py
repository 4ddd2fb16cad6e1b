"""memkernels: kernels that cut the memory of training.

    import memkernels as mk
    act = mk.nn.GELU(bits=3)              # drop-in for torch.nn.GELU, keeps f'(x) in 3 bits
    model = mk.convert(model, bits=3)     # swap a model's torch activations in place
    lin = mk.nn.Linear(1024, 4096, save="int2")   # keeps a 2-bit code of its input for backward
    mk.profile.saved_bytes(model, x)      # bytes autograd keeps for backward
    plan = mk.checkpoint.plan(model, (x,), budget="2GB")   # recompute under a memory budget
    trainer = mk.feedback.Trainer(model, rule="memdfa", loss=F.cross_entropy, optimizer=opt)
"""
from memkernels import checkpoint, compress, feedback, functional, nn, ops, profile
from memkernels.activations.elementwise import Elementwise, elementwise
from memkernels.convert import ConversionReport, convert

__version__ = "0.1.0"
__all__ = ["checkpoint", "compress", "feedback", "functional", "nn", "ops", "profile", "convert", "ConversionReport", "elementwise",
           "Elementwise", "__version__"]
