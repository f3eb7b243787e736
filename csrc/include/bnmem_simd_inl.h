// Vector load/store/broadcast helpers shared by the CPU micro-kernels (GCC vector extensions: one
// source compiles for every instruction set). Included INSIDE a kernel file's namespace and its
// `#pragma GCC push_options` / fp-contract region, after <cstring>, so that the helpers carry the same
// optimization options as the always-inline micro-kernels that call them.
#ifndef BNMEM_SIMD_INL_H_
#define BNMEM_SIMD_INL_H_

#define BNMEM_INLINE inline __attribute__((always_inline))

template <typename V, typename T>
BNMEM_INLINE V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
BNMEM_INLINE void storeu(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// all lanes = s. (V{} + s compiles to one scalar add and a broadcast; the exact identities s - V{} or a
// lane-by-lane fill compile to a chain of lane inserts with GCC 12 here.)
template <typename V, typename T>
BNMEM_INLINE V bcast(T s) {
  return V{} + s;
}

#endif  // BNMEM_SIMD_INL_H_
