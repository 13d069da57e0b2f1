"""Train an ASLA agent: same as `asla train`, e.g. python scripts/train.py configs/tiny-pd2o.yaml --set episodes=300"""
import sys

from asla.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
