import sys

from nla_ray.cli import main

sys.exit(main())
