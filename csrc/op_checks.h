// Argument checks shared by the precondition / scale / conv-factor bindings (host only).
#pragma once

#include <cstdint>
#include <string>

#include "tensor_intake.h"

namespace kfac {

// ValueError("<name>: expected shape (r, c), got (...)") unless t is r x c.
inline void require_matrix(const CudaTensor& t, const char* name, int64_t rows, int64_t cols) {
    require_shape(t.size(0) == rows && t.size(1) == cols, name,
                  "expected shape (" + std::to_string(rows) + ", " + std::to_string(cols) + "), got " +
                      shape_string(t));
}

inline void require_vector(const CudaTensor& t, const char* name, int64_t length) {
    require_shape(t.size(0) == length, name,
                  "expected shape (" + std::to_string(length) + ",), got " + shape_string(t));
}

inline int64_t element_bytes(const CudaTensor& t) { return t.dtype() == DType::Float32 ? 4 : 2; }

// ValueError unless the byte ranges of `out` (written) and `other` are disjoint.
inline void require_disjoint(const CudaTensor& out, const char* out_name, const CudaTensor& other,
                             const char* other_name) {
    const auto* a = static_cast<const char*>(out.data());
    const auto* b = static_cast<const char*>(other.data());
    const bool disjoint = a + out.numel() * element_bytes(out) <= b || b + other.numel() * element_bytes(other) <= a;
    require_shape(disjoint, out_name, std::string("must not overlap ") + other_name);
}

// ValueError unless the 1-D fp32 workspace holds at least `floats` elements.
inline void require_workspace(const CudaTensor& ws, int64_t floats) {
    require_shape(ws.numel() >= floats, "workspace",
                  "needs at least " + std::to_string(floats) + " float32 elements, got " + shape_string(ws));
}

}  // namespace kfac
