/* glibc < 2.38 shim for scripts/check_llama_cpp.py (used only when llama.cpp's prebuilt libraries
   fail to load with "version `GLIBC_2.38' not found").

   The libraries of llama-cpp-py-sync's manylinux wheel import four C23 entry points that glibc added in
   2.38. They differ from the classic functions only in also accepting "0b"/"0B" binary prefixes (and
   %b in scanf), which llama.cpp does not rely on, so forwarding to the classic functions is exact for
   its inputs. check_llama_cpp.py links this file with a version script that puts the four symbols under
   version GLIBC_2.38, marks the GLIBC_2.38 version need of the wheel's libraries weak, and preloads the
   result (LD_PRELOAD, with LD_BIND_NOW=1 so any other missing symbol fails at load, not mid-run). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }

unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }

unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }

int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsscanf(s, format, args);
    va_end(args);
    return n;
}
