import sys

from spider.client.cli import main

sys.exit(main())
