import sys

from dpo_dist.bench.run import main

main(sys.argv[1:])
