"""`python tests/gcs_launch.py MODULE ARGS...`: runs `python -m MODULE ARGS` with Beam's search for Google
credentials skipped (about 25 s of retries on a machine without them), for commands against the emulator."""

import runpy
import sys

import apache_beam.internal.gcp.auth as auth

auth._Credentials.get_service_credentials = classmethod(lambda cls, options: None)
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
