#!/usr/bin/env bash
# Here (with the package index), for bench/lm_eval_gpu.py on the GPU machine: lm-eval and the modules it imports
# that the machine, vLLM's site and site.tgz lack, at requirements.lock's versions, into .whl/a (scipy alone) and
# .whl/b: one device call each carries at most 64 MiB with the working tree. Then, in ONE message before the call
# that uses them: run(command="mkdir -p /tmp/whl && cp .whl/a/* /tmp/whl/", carry=[".whl/a"]), the same for .whl/b;
# `source bench/device.sh` installs them into /tmp/lmsite.
set -eu
cd "$(dirname "$0")/.."
pins() { for p in "$@"; do grep -i "^$p==" requirements.lock | cut -d' ' -f1; done; }
rm -rf .whl && mkdir -p .whl/a .whl/b
platform="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
pip download -q --no-deps $platform -d .whl/a $(pins scipy)
pip download -q --no-deps $platform -d .whl/b $(pins lm-eval sacrebleu portalocker colorama lxml tabulate scikit-learn \
  joblib threadpoolctl chardet evaluate nltk absl-py pytablewriter dataproperty mbstrdecoder pathvalidate tabledata \
  tcolorpy typepy regex more-itertools)
pip wheel -q --no-deps -w .whl/b $(pins word2number sqlitedict rouge-score)  # sdists only: pure-Python wheels here
du -sh .whl/a .whl/b
