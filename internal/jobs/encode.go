package jobs

import "encoding/json"

func encodeAction(a ActionRequest) string {
	b, _ := json.Marshal(a) // a plain struct of strings always encodes
	return string(b)
}

func decodeAction(s string) ActionRequest {
	var a ActionRequest
	_ = json.Unmarshal([]byte(s), &a) // written by encodeAction; empty for kinds without parameters
	return a
}
