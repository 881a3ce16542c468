"""Tests run on tinygrad's CPU backend unless DEV says otherwise (with an OpenCL driver installed, tinygrad
would pick CL by itself), and import the project's modules from the repository root."""
import os, sys
os.environ.setdefault("DEV", "CPU")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
