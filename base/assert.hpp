// MOE_ASSERT: a broken invariant is a bug, never bad input. Bad input gets an error value.
// Active in every build type: the checks guard memory safety of raw-pointer kernels.
#pragma once

#include <cstdio>
#include <cstdlib>

#define MOE_ASSERT(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (false)
