package nbd

import (
	"encoding/binary"
	"errors"
)

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic        = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic   = 0x0003e889045565a9
	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Options.
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	// Option reply types.
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrTLSReqd  = 1<<31 + 5
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7

	// NBD_INFO types.
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// Command flags.
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	// Structured reply chunk types and flags.
	chunkFlagDone   = 1 << 0
	chunkNone       = 0
	chunkOffsetData = 1
	chunkOffsetHole = 2
	chunkBlockStat  = 5
	chunkError      = 1<<15 + 1

	// base:allocation status flags.
	stateHole = 1 << 0
	stateZero = 1 << 1

	// NBD error values.
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// Limits the server enforces on every connection.
const (
	// MaxPayload (32 MiB) is the largest READ or WRITE the server accepts (NBD_INFO_BLOCK_SIZE maximum).
	MaxPayload = 1 << maxPayloadShift
	// maxPayloadShift is log2(MaxPayload): 32 MiB.
	maxPayloadShift = 25
	// preferredBlock is the advertised preferred block size.
	preferredBlock = 4096
	// maxOptionLen bounds the data of one handshake option.
	maxOptionLen = 64 << 10
	// maxOptions bounds the number of options in one handshake.
	maxOptions = 1024
	// maxStringLen is the protocol's limit on names and other strings.
	maxStringLen = 4096
	// metaContextBaseAllocation is the id given to base:allocation.
	metaContextBaseAllocation = 1
	// requestHeaderLen is the size of a (compact) request header.
	requestHeaderLen = 28
)

// baseAllocation is the only metadata context the server offers.
const baseAllocation = "base:allocation"

var errMalformed = errors.New("malformed option data")

// infoRequest is the parsed data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes the data of NBD_OPT_INFO / NBD_OPT_GO.
func parseInfoRequest(data []byte) (infoRequest, error) {
	var r infoRequest
	if len(data) < 4 {
		return r, errMalformed
	}
	n := binary.BigEndian.Uint32(data)
	data = data[4:]
	if n > maxStringLen || uint64(n) > uint64(len(data)) {
		return r, errMalformed
	}
	r.name = string(data[:n])
	data = data[n:]
	if len(data) < 2 {
		return r, errMalformed
	}
	count := int(binary.BigEndian.Uint16(data))
	data = data[2:]
	if len(data) != 2*count {
		return r, errMalformed
	}
	r.infos = make([]uint16, count)
	for i := range r.infos {
		r.infos[i] = binary.BigEndian.Uint16(data[2*i:])
	}
	return r, nil
}

// metaRequest is the parsed data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
type metaRequest struct {
	name    string
	queries []string
}

// parseMetaRequest decodes the data of the meta-context options.
func parseMetaRequest(data []byte) (metaRequest, error) {
	var r metaRequest
	if len(data) < 4 {
		return r, errMalformed
	}
	n := binary.BigEndian.Uint32(data)
	data = data[4:]
	if n > maxStringLen || uint64(n) > uint64(len(data)) {
		return r, errMalformed
	}
	r.name = string(data[:n])
	data = data[n:]
	if len(data) < 4 {
		return r, errMalformed
	}
	count := binary.BigEndian.Uint32(data)
	data = data[4:]
	// Each query needs at least its 4-byte length, which bounds count by the data.
	if uint64(count)*4 > uint64(len(data)) {
		return r, errMalformed
	}
	r.queries = make([]string, 0, count)
	for i := uint32(0); i < count; i++ {
		if len(data) < 4 {
			return r, errMalformed
		}
		q := binary.BigEndian.Uint32(data)
		data = data[4:]
		if q > maxStringLen || uint64(q) > uint64(len(data)) {
			return r, errMalformed
		}
		r.queries = append(r.queries, string(data[:q]))
		data = data[q:]
	}
	if len(data) != 0 {
		return r, errMalformed
	}
	return r, nil
}

// requestHeader is one decoded transmission-phase request header.
type requestHeader struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

// parseRequestHeader decodes a 28-byte request header; it fails only on a bad magic.
func parseRequestHeader(b []byte) (requestHeader, error) {
	var h requestHeader
	if len(b) < requestHeaderLen {
		return h, errors.New("short request header")
	}
	if m := binary.BigEndian.Uint32(b); m != requestMagic {
		return h, errors.New("bad request magic")
	}
	h.flags = binary.BigEndian.Uint16(b[4:])
	h.typ = binary.BigEndian.Uint16(b[6:])
	h.cookie = binary.BigEndian.Uint64(b[8:])
	h.off = binary.BigEndian.Uint64(b[16:])
	h.length = binary.BigEndian.Uint32(b[24:])
	return h, nil
}

// errorCode maps an Export error to an NBD error value.
func errorCode(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrNoSpace):
		return errNoSpc
	case errors.Is(err, ErrReadOnly):
		return errPerm
	case errors.Is(err, ErrInvalid):
		return errInval
	case errors.Is(err, ErrFastZeroUnsupported):
		return errNotSup
	default:
		return errIO
	}
}
