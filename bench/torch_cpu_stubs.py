#!/usr/bin/env python3
"""Make PyPI's CUDA build of torch importable on a CPU-only machine without
the ~1.8 GB of nvidia-* wheels it depends on.

PyPI only ships CUDA builds of torch for x86-64 Linux. Installed with
`--no-deps`, `import torch` fails because libtorch_cuda.so & co. list
libcudart.so.13, libcublas.so.13, libcudnn.so.9, ... as DT_NEEDED. This script
builds a tiny stub shared library for each such missing library, exporting
every symbol (with its symbol version) that torch's libraries import from it,
and puts the stubs in torch/lib ($ORIGIN, the LAST entry of torch's RPATH, so
real nvidia-* libraries, if ever installed, still take precedence).

Every stub function returns an error code (cudart: 100 = cudaErrorNoDevice, and
cudaGetDeviceCount reports 0 devices), "*GetErrorString"/"*GetErrorName"
return a static message, so torch sees "no CUDA device" and runs on the CPU.
No CUDA code is ever reached on the CPU path.

Usage: torch_cpu_stubs.py SITE_PACKAGES_DIR     (needs gcc and readelf)
"""

import glob
import os
import re
import subprocess
import sys
import tempfile


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed(path):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", "-W", path))


def version_files(path):
    """Version-need name -> file (soname) that must provide it."""
    out = run("readelf", "-V", "-W", path)
    sect = out.split(".gnu.version_r", 1)
    res, cur = {}, None
    if len(sect) < 2:
        return res
    for line in sect[1].splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and cur:
            res[m.group(1)] = cur
    return res


def dynsyms(path):
    """[(type, bind, ndx, name, version or None)]"""
    res = []
    for line in run("readelf", "--dyn-syms", "-W", path).splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].rstrip(":").isdigit():
            continue
        typ, bind, ndx, name = f[3], f[4], f[6], f[7]
        ver = None
        if "@" in name:
            name, _, ver = name.partition("@")
            ver = ver.lstrip("@")
        res.append((typ, bind, ndx, name, ver))
    return res


def system_sonames():
    names = set()
    try:
        for line in run("ldconfig", "-p").splitlines()[1:]:
            names.add(line.strip().split(" ", 1)[0])
    except (OSError, subprocess.CalledProcessError):
        pass
    return names


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    site = sys.argv[1]
    torch_dir = os.path.join(site, "torch")
    libdir = os.path.join(torch_dir, "lib")
    if not os.path.isdir(libdir):
        sys.exit(f"no torch/lib under {site}")

    elfs = sorted(set(glob.glob(os.path.join(libdir, "*.so*")) + glob.glob(os.path.join(torch_dir, "*.so"))))
    rpath_dirs = [libdir] + [os.path.normpath(os.path.join(libdir, "../..", d)) for d in
                             ("nvidia/cudnn/lib", "nvidia/nvshmem/lib", "nvidia/nccl/lib",
                              "nvidia/cusparselt/lib", "nvidia/cu13/lib")]
    present = set(system_sonames())
    for d in rpath_dirs:
        if os.path.isdir(d):
            present.update(os.listdir(d))

    stub_marker = ".bertrt-stub"
    missing = set()
    for e in elfs:
        for n in needed(e):
            stubbed = os.path.exists(os.path.join(libdir, n + stub_marker))
            if n not in present or stubbed:
                missing.add(n)
    if not missing:
        print("torch_cpu_stubs: every library torch needs is present; nothing to do")
        return

    # Symbols defined by something that will really be loaded (torch's own libs + system).
    defined = set()
    for e in elfs:
        for typ, bind, ndx, name, ver in dynsyms(e):
            if ndx != "UND":
                defined.add(name)

    versioned = {s: {} for s in missing}    # soname -> {version: {name: type}}
    unversioned = {s: {} for s in missing}  # soname -> {name: type}
    for e in elfs:
        nd = [n for n in needed(e) if n in missing]
        if not nd:
            continue
        vf = version_files(e)
        for typ, bind, ndx, name, ver in dynsyms(e):
            if ndx != "UND" or bind == "WEAK" or not name:
                continue
            if ver and vf.get(ver) in missing:
                versioned[vf[ver]].setdefault(ver, {})[name] = typ
            elif not ver and name not in defined:
                # cannot tell which library provides it: put it in every missing one this ELF needs
                for n in nd:
                    unversioned[n][name] = typ

    # Unversioned refs that libc/libstdc++ & co. satisfy must not be shadowed: keep
    # only those not found in any system library torch already loads.
    sys_defined = set()
    for lib in ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0",
                "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"):
        for line in run("ldconfig", "-p").splitlines():
            f = line.strip().split(" => ")
            if len(f) == 2 and f[0].split(" ", 1)[0] == lib and "x86-64" in f[0]:
                for typ, bind, ndx, name, ver in dynsyms(f[1]):
                    if ndx != "UND":
                        sys_defined.add(name)
                break
    for n in unversioned:
        unversioned[n] = {k: v for k, v in unversioned[n].items() if k not in sys_defined}

    with tempfile.TemporaryDirectory() as tmp:
        total = 0
        for soname in sorted(missing):
            syms = {}
            for ver, d in versioned[soname].items():
                syms.update(d)
            syms.update(unversioned[soname])
            cudart = soname.startswith("libcudart")
            err = 100 if cudart else 1
            lines = ['static const char msg[] = "CUDA is not available (CPU-only torch: stub library)";']
            for i, (name, typ) in enumerate(sorted(syms.items())):
                if typ == "OBJECT":
                    lines.append(f'__attribute__((visibility("default"))) char o{i}[256] __asm__("{name}");')
                elif re.search(r"GetError(String|Name)$|ErrorString$", name):
                    lines.append(f'__attribute__((visibility("default"))) const char *f{i}(void) __asm__("{name}");')
                    lines.append(f"const char *f{i}(void) {{ return msg; }}")
                elif cudart and name in ("cudaGetDeviceCount", "cudaGetDeviceCount_v2"):
                    lines.append(f'__attribute__((visibility("default"))) int f{i}(int *c) __asm__("{name}");')
                    lines.append(f"int f{i}(int *c) {{ if (c) *c = 0; return {err}; }}")
                else:
                    lines.append(f'__attribute__((visibility("default"))) long f{i}(void) __asm__("{name}");')
                    lines.append(f"long f{i}(void) {{ return {err}; }}")
            c = os.path.join(tmp, "stub.c")
            with open(c, "w") as fh:
                fh.write("\n".join(lines) + "\n")
            vs = os.path.join(tmp, "stub.map")
            with open(vs, "w") as fh:
                for ver, d in sorted(versioned[soname].items()):
                    fh.write(f"{ver} {{ global: {'; '.join(sorted(d))}; }};\n")
                if not versioned[soname]:
                    fh.write("{ global: *; };\n")
            out = os.path.join(libdir, soname)
            cmd = ["gcc", "-shared", "-fPIC", "-O1", "-o", out + ".tmp", c, f"-Wl,-soname,{soname}"]
            if versioned[soname]:
                cmd.append(f"-Wl,--version-script={vs}")
            subprocess.run(cmd, check=True)
            os.replace(out + ".tmp", out)
            open(out + stub_marker, "w").close()
            total += len(syms)
            print(f"torch_cpu_stubs: {soname:24s} {len(syms):4d} symbols -> {out}")
        print(f"torch_cpu_stubs: {len(missing)} stub libraries, {total} symbols")


if __name__ == "__main__":
    main()
