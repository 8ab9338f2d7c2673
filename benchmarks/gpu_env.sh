# Sourced by the GPU scripts: $OUT for results, the slim Ray wheel (.gpu_site.tar.xz, see
# ../shared/GPU.md) unpacked onto PYTHONPATH, token auth for Ray, and $PY.
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
SITE=/tmp/raypod_site
if [ -f .gpu_site.tar.xz ]; then
  mkdir -p $SITE && tar xJf .gpu_site.tar.xz -C $SITE
  export PYTHONPATH=$SITE:$PWD
fi
export RAY_AUTH_MODE=token PYTHONUNBUFFERED=1
PY=${PY:-python3}
