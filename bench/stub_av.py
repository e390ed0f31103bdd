"""Write a stand-in ``av`` (PyAV) package into a folder, for GPU machines whose Python lacks PyAV.

ComfyUI's executor imports PyAV for its video types; the benches here use no video, so an empty
stand-in whose every attribute is a placeholder class lets ``import execution`` succeed there:

    python bench/stub_av.py /tmp/site && export PYTHONPATH=/tmp/site
Never install it where real video work happens.
"""
import os
import sys

STUB = '''"""Stand-in for PyAV written by bench/stub_av.py (no video support)."""
def __getattr__(name):
    return type(name, (), {})
'''

if __name__ == "__main__":
    root = sys.argv[1]
    for sub in ("av", "av/container", "av/subtitles", "av/subtitles/stream"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        with open(os.path.join(root, sub, "__init__.py"), "w") as f:
            f.write(STUB)
    print(f"stand-in av package in {root}")
