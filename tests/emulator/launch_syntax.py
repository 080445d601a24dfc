#!/usr/bin/env python3
"""Rewrites a .cu file into host C++ for the CUDA emulator (cuda_emulator.hpp).

Two constructs have no host spelling, so they are rewritten; everything else compiles as is
once the emulator header is included first:
  kernel<T><<<grid, block, smem, stream>>>(args)
      ->  ::emu::launch_named("kernel", kernel<T>, grid, block, smem, stream)(args)
      (the name lets a test fail one kernel's launches: emu::fail_launches)
  extern __shared__ [__align__(N)] T name[];     ->  T* name = the launch's dynamic shared buffer
usage: launch_syntax.py IN.cu OUT.cpp
"""
import re
import sys

src = open(sys.argv[1]).read()
launch = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>()]*>)?)\s*<<<(.*?)>>>\(', re.S)
out, launches = launch.subn(lambda m: '::emu::launch_named("' + m.group(1).split('<')[0] + '", '
                            + m.group(1) + ', ' + m.group(2) + ')(', src)
dynamic = re.compile(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:][\w: ]*?)\s+(\w+)\[\];')
out, arrays = dynamic.subn(lambda m: m.group(1) + '* ' + m.group(2) + ' = reinterpret_cast<' + m.group(1)
                          + '*>(::emu::dynamic_smem.data());', out)
with open(sys.argv[2], 'w') as f:
    f.write('// Generated from ' + sys.argv[1] + ' by tests/emulator/launch_syntax.py: do not edit.\n')
    f.write('#line 1 "' + sys.argv[1] + '"\n')
    f.write(out)
