// The build key (quanta/kernels/build_config.py: sources, flags, torch, Python, CPU), compiled
// in as -DQUANTA_BUILD_KEY=k<16 hex digits> so that a loader can read it from the library's
// bytes and refuse a library built from other sources or for another CPU without loading it.
#define QUANTA_STR2(x) #x
#define QUANTA_STR(x) QUANTA_STR2(x)
#ifndef QUANTA_BUILD_KEY
#define QUANTA_BUILD_KEY unkeyed
#endif

extern "C" __attribute__((used, visibility("default"))) const char quanta_build_key[] =
    "quanta-build-key:" QUANTA_STR(QUANTA_BUILD_KEY);
