// The AVX2 kernels of activation_kernels.h: the command line's code generation (setup.py,
// CMakeLists.txt: -mavx2 -mfma -mf16c, CPU_CAPABILITY=AVX2).
#include "cpu/activation_kernels_impl.h"
