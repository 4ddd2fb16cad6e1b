// The C++ autograd of memkernels::activation and memkernels::gated (autograd.cpp).
#pragma once
#include <string>

namespace memkernels {

// The message of the error that their backward raises under create_graph=True; memkernels.ops sets
// it to the Python one (memkernels.activations.spec.SECOND_DERIVATIVE_ERROR) on import.
void set_second_derivative_error(const std::string& message);

}  // namespace memkernels
