"""What each process of a local training job runs (segslim.train.local_job): the command's
workflow on the options the starting process parsed, checked and pickled for it.

    python -m segslim.cli.job_process < options.pickle"""
import pickle
import sys

from segslim.cli import commands, flags
from segslim.train.local_job import die_with_parent


def main() -> int:
    die_with_parent()
    command, args = pickle.load(sys.stdin.buffer)
    return flags.run(commands.workflow(command), args)


if __name__ == '__main__':
    sys.exit(main())
