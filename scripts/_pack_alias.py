"""``import _pack_alias`` first thing in a script of scripts/ (run as ``python scripts/X.py``, so scripts/ is on sys.path):
registers ``comfyui_disentangle``, the pack root as a package (harness/alias.py), so that the script
imports the pack, and its harness, by that one name."""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness", "alias.py"))
