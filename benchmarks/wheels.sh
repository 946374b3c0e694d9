# Sourced by the GPU scripts from the repo root: installs the carried wheels (every *.whl under .whl/,
# subfolders included: the device tool carries 8 paths, so a folder such as .whl/serve counts as one; see
# the device README) into /tmp/site once per process tree, and puts /tmp/site and the repo on PYTHONPATH.
# Without .whl/ (CI, a CPU check) nothing is installed and the repo alone is on the path.
if [ -z "${WHEELS_INSTALLED:-}" ]; then
    mapfile -t _wheels < <(find .whl -type f -name '*.whl' 2> /dev/null | sort)
    if [ "${#_wheels[@]}" -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${_wheels[@]}" || echo "wheels.sh: some wheels did not install" >&2
    fi
    export WHEELS_INSTALLED=1
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi
