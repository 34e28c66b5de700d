"""`python -m validator run --config streamprov.yaml`: the same as `streamprov validator run`."""

from validator.cli import validator_app

if __name__ == "__main__":
    validator_app(prog_name="python -m validator")
