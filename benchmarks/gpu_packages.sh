# Sourced by the GPU scripts: make the packages the GPU machine lacks importable from /tmp/site.
# Wheels come from .whl/ (git-ignored). Only those whose package is missing are installed: shadowing an
# installed one (e.g. importlib_metadata) can break other packages that import it.
mkdir -p /tmp/site
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  module=$(basename "$wheel" | cut -d- -f1)
  python3 -c "import $module" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$wheel"
done
# A transformers that cannot import its models breaks diffusers' optional integrations (through peft): hide both.
python3 -c "from transformers import PreTrainedModel" 2>/dev/null \
  || echo "import sys; sys.modules.update(transformers=None, peft=None)" > /tmp/site/sitecustomize.py
