# GrowServer build, test and benchmark entry points.
# On a fresh Debian 12 machine, as root: `make up` brings the platform up, `make test` runs every test.

GO        ?= go
BIN       := bin/grow
export GROW_GUEST_DIR ?= $(CURDIR)/.cache/guest
TEST_TIMEOUT ?= 28m

.PHONY: all build deps guest up test unit bench fmt vet clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/grow

deps:
	bash scripts/install-deps.sh

# The tiny test guest: a Debian kernel plus a busybox initramfs, into $(GROW_GUEST_DIR).
guest: deps
	bash scripts/build-guest.sh "$(GROW_GUEST_DIR)"

up: deps build guest
	bash scripts/up.sh

# Every test: unit, fuzz seeds, interop with real NBD clients, end-to-end with real QEMU guests.
# The packages under test/ boot TCG guests and measure timing (ping loss during migration,
# shaping rates), so they run one package at a time after everything else.
test: deps build guest
	GROW_BIN=$(CURDIR)/$(BIN) $(GO) test -p 2 -timeout $(TEST_TIMEOUT) $$($(GO) list ./... | grep -v '/test/')
	GROW_BIN=$(CURDIR)/$(BIN) $(GO) test -p 1 -timeout $(TEST_TIMEOUT) ./test/...

# Pure-Go tests only (no root, no QEMU); quick feedback while editing.
unit:
	$(GO) test -short ./...

bench: deps build guest
	GROW_BIN=$(CURDIR)/$(BIN) bash bench/run.sh

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet ./...

clean:
	rm -rf bin .cache
