# Sourced on the GPU machine (`source bench/device.sh`) once the chunks that shared/device/make-vllm-site.sh,
# make-site.sh and real-model.sh build have been copied to /tmp/vacc, /tmp/carry and /tmp/acc by one
# device call each: unpacks vLLM + TRL, the rest of the stack (DVC, Unsloth, ...), the real model's GGUF (site.tgz has the gguf reader),
# and sets the environment vLLM needs there (FlashInfer is not carried).
GGUF_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ ! -d /tmp/vsite/vllm ] && [ -d /tmp/vacc ]; then
  # make-vllm-site.sh writes the archive's sha256 beside its chunks (a rebuild changes it); the first chunk's
  # call brings it to /tmp/vacc.
  VLLM_SHA=$(cat /tmp/vacc/SHA256) || echo "device.sh: carry .carry/vllm/SHA256 with the first vLLM chunk" >&2
  cat /tmp/vacc/part* > /tmp/vsite.tar.xz && echo "$VLLM_SHA  /tmp/vsite.tar.xz" | sha256sum -c - \
    && mkdir -p /tmp/vsite && tar xJf /tmp/vsite.tar.xz -C /tmp/vsite && rm /tmp/vsite.tar.xz
fi
if [ ! -d /tmp/site/dvc ] && [ -f /tmp/carry/site.tgz ]; then
  mkdir -p /tmp/site && tar xzf /tmp/carry/site.tgz -C /tmp/site
fi
if [ ! -f /tmp/model.gguf ] && [ -d /tmp/acc ]; then
  cat /tmp/acc/part* > /tmp/model.gguf && echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c - && rm -rf /tmp/acc
fi
if [ ! -d /tmp/lmsite/lm_eval ] && ls /tmp/whl/*.whl > /dev/null 2>&1; then
  # lm-eval and what it imports that the machine lacks (.whl/a and .whl/b, built as bench/lm_eval_gpu.py says)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmsite /tmp/whl/*.whl
fi
export PYTHONPATH=/tmp/vsite:/tmp/site:/tmp/lmsite VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
export PATH=/tmp/site/bin:$PATH
